"""Pipeline schedules as data: actions, builders, lowering, verifier, simulator.

``build("1f1b", p, m)`` returns every rank's list of compute actions; :func:`lower`
adds the sends and receives; :func:`verify` dry-runs a table in one process (no MPI)
and :func:`simulate` predicts its step time and bubble on a :class:`CostModel`.
:class:`mpimp.Pipeline` runs any such table with one executor.
"""

from __future__ import annotations

from .actions import (
    COMM,
    COMPUTE,
    KINDS,
    Action,
    format_table,
    is_lowered,
    lower,
    parse_action,
    parse_table,
    stage_owners,
)
from .builders import (
    BUILDERS,
    build,
    default_virtual_stages,
    gpipe,
    interleaved_1f1b,
    interleaved_zb,
    one_f_one_b,
    v_owner,
    zb_h1,
    zb_v,
)
from .verify import CostModel, Report, ScheduleError, format_grid, simulate, spread, verify

__all__ = [
    "Action",
    "COMPUTE",
    "COMM",
    "KINDS",
    "parse_action",
    "parse_table",
    "format_table",
    "stage_owners",
    "lower",
    "is_lowered",
    "BUILDERS",
    "build",
    "gpipe",
    "one_f_one_b",
    "interleaved_zb",
    "interleaved_1f1b",
    "zb_h1",
    "zb_v",
    "v_owner",
    "default_virtual_stages",
    "CostModel",
    "Report",
    "ScheduleError",
    "format_grid",
    "verify",
    "simulate",
    "spread",
]
