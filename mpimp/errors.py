"""Exception types that mpimp raises.

Problem: a failure on one of hundreds of ranks is useless unless the message says
which rank, which numbers were wrong and what to change.  Every mpimp error is a
subclass of :class:`MpimpError` and its text carries that information; user input
is checked with ``raise``, never ``assert`` (asserts vanish under ``python -O``).
"""

from __future__ import annotations

import os

__all__ = ["MpimpError", "ConfigError", "TransportError", "DeadlineError", "rank_prefix", "env_switch"]


class MpimpError(RuntimeError):
    """Base class of every error raised by mpimp."""


class ConfigError(MpimpError, ValueError):
    """A layout, shape or option that cannot work (raised identically on every rank)."""


class TransportError(MpimpError):
    """A message that does not match what the receiver expected (size, dtype, shape)."""


class DeadlineError(MpimpError, TimeoutError):
    """A wait on MPI did not complete before its deadline (``MPIMP_TIMEOUT`` seconds)."""


def rank_prefix() -> str:
    """``"r3 | "`` for world rank 3 (of the process's ``COMM_WORLD``), or ``""`` before MPI."""
    try:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            return f"r{MPI.COMM_WORLD.Get_rank()} | "
    except Exception:  # pragma: no cover - mpi4py missing
        pass
    return ""


def env_switch(name: str, default: bool, on: str, off: str) -> bool:
    """The environment variable ``name`` as a switch: ``1`` or ``0`` (``default`` when unset);
    any other value raises ConfigError saying what each does (``on``, ``off``)."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    if raw not in ("0", "1"):
        raise ConfigError(f"{name}={raw!r}: use 1 ({on}) or 0 ({off})")
    return raw == "1"
