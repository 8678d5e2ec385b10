"""The ``mpimp`` command: ``info``, ``plan``, ``train``, ``sample``, ``export``.

Problem: on a cluster a command must behave on hundreds of ranks at once: exactly one
rank prints, a bad flag gives one message and exit status 2 (not a traceback per rank),
and an unexpected exception on any rank aborts the whole job instead of leaving the
other ranks waiting forever.

Each subcommand lives in the module that owns its concept and registers itself here
through a ``(name, add_arguments, run)`` entry in :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable

from .errors import ConfigError, MpimpError

__all__ = ["main", "build_parser", "SUBCOMMANDS", "UsageError"]


class UsageError(MpimpError):
    """Bad command-line input: reported once by rank 0, exit status 2."""


def _add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dp", type=int, default=None, help="data-parallel size (default: inferred)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")


def _run_info(args: argparse.Namespace) -> int:
    from mpi4py import MPI

    from .info import format_info

    text = format_info(MPI.COMM_WORLD, dp=args.dp, pp=args.pp, tp=args.tp)
    if text is not None:
        print(text, flush=True)
    return 0


Subcommand = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def _subcommands() -> list[Subcommand]:
    cmds: list[Subcommand] = [
        ("info", "MPI library, CUDA-awareness, versions and the rank grid", _add_info, _run_info),
    ]
    # Subcommands of other modules are imported lazily so `mpimp info` stays cheap.
    for module, name in (("planner", "plan"), ("trainer_cli", "train"),
                         ("trainer_cli", "sample"), ("trainer_cli", "export")):
        try:
            mod = __import__(f"mpimp.{module}", fromlist=["COMMANDS"])
        except ModuleNotFoundError as exc:
            if exc.name != f"mpimp.{module}":
                raise
            continue
        for entry in getattr(mod, "COMMANDS", ()):
            if entry[0] == name:
                cmds.append(entry)
    return cmds


SUBCOMMANDS = _subcommands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpimp",
        description="MPI-native model-parallel training for PyTorch. Launch under mpirun or srun, "
        "e.g. `mpirun -n 4 mpimp train --pp 2 --tp 2`.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, help_text, add, run in _subcommands():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.set_defaults(_run=run)
    return parser


def _rank() -> int:
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank()


def main(argv: list[str] | None = None) -> int:
    """Entry point.  Usage errors exit 2 (printed by rank 0 only); crashes abort the job."""
    rank = _rank()
    parser = build_parser()
    try:
        if rank != 0:
            # Only rank 0 prints usage errors and --help; the others exit with the same status.
            with open(os.devnull, "w") as devnull:
                old_out, old_err = sys.stdout, sys.stderr
                sys.stdout = sys.stderr = devnull
                try:
                    args = parser.parse_args(argv)
                finally:
                    sys.stdout, sys.stderr = old_out, old_err
        else:
            args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        return int(args._run(args) or 0)
    except (ConfigError, UsageError) as exc:
        if rank == 0:
            print(f"mpimp {args.command}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:  # noqa: BLE001 - any other failure must not leave ranks hanging
        if isinstance(exc, SystemExit):
            raise
        from mpi4py import MPI

        sys.stderr.write(f"r{rank} | mpimp {args.command}: unhandled {type(exc).__name__}; "
                         f"aborting all ranks\n{traceback.format_exc()}")
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
