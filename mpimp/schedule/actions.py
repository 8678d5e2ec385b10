"""Pipeline actions and their text form; the lowering pass that adds communication.

Problem: a pipeline schedule is usually a hand-written loop per rank, testable only on
real ranks.  Here a schedule is *data*: for every rank, the ordered list of actions it
performs in one training step.  An action is ``(stage, kind, microbatch)`` and prints
as ``{stage}{kind}{microbatch}``::

    1F0        stage 1 runs the forward of micro-batch 0
    0B3        stage 0 runs the backward of micro-batch 3 (input gradient; also the
               weight gradient unless the table holds a matching W)
    1W2        stage 1 computes the weight gradient of micro-batch 2 (zero-bubble split)
    1SEND_F0   stage 1 sends its output of micro-batch 0 to stage 2
    2RECV_F0   stage 2 receives that input
    2SEND_B0   stage 2 sends the gradient of its input of micro-batch 0 to stage 1
    1RECV_B0   stage 1 receives the gradient of its output

``stage`` is the *virtual* stage: with ``v`` virtual stages per rank there are
``p * v`` of them and each belongs to exactly one rank (stage ``s`` lives on rank ``s % p``
in the interleaved schedules, in a V for ``zb-v``; in a table, on the rank whose row runs
it).  Builders (:mod:`.builders`) produce compute-only tables; :func:`lower` inserts the
send/receive actions between stages that live on different ranks.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from ..errors import ConfigError

__all__ = [
    "Action",
    "COMPUTE",
    "COMM",
    "KINDS",
    "parse_action",
    "parse_table",
    "format_table",
    "format_grid",
    "stage_owners",
    "lower",
    "is_lowered",
]

COMPUTE = ("F", "B", "W")
COMM = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")
KINDS = COMPUTE + COMM
_RE = re.compile(r"^\s*(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|F|B|W)(\d+)\s*$")

Table = list[list["Action"]]


class Action(NamedTuple):
    """One step of one rank: ``stage`` (virtual stage), ``kind`` (see KINDS), ``mb`` (micro-batch)."""

    stage: int
    kind: str
    mb: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.mb}"

    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE

    def matching_send(self) -> Action:
        """The send a receive matches: ``sRECV_Fi`` <- ``(s-1)SEND_Fi``, ``sRECV_Bi`` <- ``(s+1)SEND_Bi``."""
        if self.kind == "RECV_F":
            return Action(self.stage - 1, "SEND_F", self.mb)
        if self.kind == "RECV_B":
            return Action(self.stage + 1, "SEND_B", self.mb)
        raise ValueError(f"{self} is not a receive")


def parse_action(text: str | Action) -> Action:
    """``"1F0"`` -> ``Action(1, "F", 0)``; raises ConfigError on anything else."""
    if isinstance(text, tuple) and len(text) == 3:  # an Action or a (stage, kind, mb) tuple
        stage, kind, mb = text
        if (isinstance(stage, int) and not isinstance(stage, bool) and stage >= 0 and kind in KINDS
                and isinstance(mb, int) and not isinstance(mb, bool) and mb >= 0):
            return text if isinstance(text, Action) else Action(stage, kind, mb)
    m = _RE.match(str(text)) if isinstance(text, str) else None
    if m is None:
        raise ConfigError(
            f"malformed action {text!r}: expected <stage><kind><microbatch> with kind one of "
            f"{', '.join(KINDS)}, e.g. '1F0', '0B3', '1W2', '1SEND_F0'"
        )
    return Action(int(m.group(1)), m.group(2), int(m.group(3)))


def parse_table(table: str | Sequence[Sequence[str | Action]]) -> Table:
    """A table from text (one line per rank, actions separated by blanks) or nested lists.

    Lines starting with ``#`` and empty lines are ignored; a line may start with
    ``rank N:`` (as :func:`format_table` writes it).
    """
    if isinstance(table, str):
        rows: list[list[str]] = []
        for line in table.splitlines():
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if line.lower().startswith("rank"):
                label, _, line = line.partition(":")
                if label[4:].strip() != str(len(rows)):
                    raise ConfigError(
                        f"action table line {label!r}: rows must be 'rank 0:', 'rank 1:', ... in order "
                        f"(this is row {len(rows)})"
                    )
            rows.append(line.replace(",", " ").split())
        return _parse_rows(rows)
    if not isinstance(table, (list, tuple)) or not all(isinstance(r, (list, tuple)) for r in table):
        raise ConfigError(
            f"an action table is a list (one entry per rank) of lists of actions, got {type(table).__name__}"
        )
    return _parse_rows(table)


def _parse_rows(rows: Sequence[Sequence[object]]) -> Table:
    """Every token parsed; a malformed one is named with its rank and step, and the grid of
    the raw tokens shows it marked."""
    out: Table = []
    for r, row in enumerate(rows):
        parsed = []
        for c, token in enumerate(row):
            try:
                parsed.append(parse_action(token))  # type: ignore[arg-type]
            except ConfigError as exc:
                raise ConfigError(f"{exc} (rank {r}, step {c})\n{format_grid(rows, {r: c})}") from None
        out.append(parsed)
    return out


def format_grid(table: Sequence[Sequence[object]], marks: dict[int, int], width: int = 6) -> str:
    """The rank x step grid, each marked action as ``>>1F0<<``, columns near the marks only
    (the actions, or the raw tokens of a table that does not parse)."""
    if not table:
        return "(empty table)"
    cols = [c for c in marks.values()] or [0]
    lo = max(0, min(cols) - width)
    hi = max(cols) + width + 1
    lines = []
    longest = max(len(row) for row in table)
    hi = min(hi, longest)
    header = "step    " + " ".join(f"{c:>11}" for c in range(lo, hi))
    lines.append(header + ("  ..." if hi < longest else ""))
    for r, row in enumerate(table):
        cells = []
        for c in range(lo, hi):
            if c >= len(row):
                cells.append(f"{'':>11}")
                continue
            text = str(row[c])
            if marks.get(r) == c:
                text = f">>{text}<<"
            cells.append(f"{text:>11}")
        lines.append(f"rank {r:<3}" + " ".join(cells))
    if lo > 0:
        lines.insert(1, f"(steps {lo}..{hi - 1} of {longest})")
    return "\n".join(lines)


def format_table(table: Sequence[Sequence[Action]]) -> str:
    """One line per rank: ``rank 0: 0F0 0F1 0B0 ...`` (the golden-file format)."""
    return "\n".join(f"rank {r}: " + " ".join(str(a) for a in row) for r, row in enumerate(table)) + "\n"


def stage_owners(table: Sequence[Sequence[Action]]) -> dict[int, int]:
    """Map each stage to the rank whose row holds its compute actions (error if two ranks do)."""
    owner: dict[int, int] = {}
    for r, row in enumerate(table):
        for a in row:
            if a.kind not in COMPUTE:
                continue
            prev = owner.setdefault(a.stage, r)
            if prev != r:
                raise ConfigError(
                    f"stage {a.stage} has compute actions on rank {prev} and on rank {r} ({a}); "
                    f"every stage must live on exactly one rank"
                )
    return owner


def is_lowered(table: Iterable[Iterable[Action]]) -> bool:
    return any(a.kind in COMM for row in table for a in row)


def lower(table: Sequence[Sequence[Action]]) -> Table:
    """Insert SEND_F/RECV_F/SEND_B/RECV_B around compute actions whose neighbour stage is remote.

    ``RECV_F`` goes right before the forward that consumes it and ``SEND_F`` right after
    the forward that produces it (likewise for backward).  The executor posts every
    receive at the start of the step, so a RECV action is only the point where the data
    must have arrived; sends are non-blocking and overlap the following compute.
    """
    owner = stage_owners(table)
    num_stages = max(owner) + 1 if owner else 0
    out: Table = []
    for r, row in enumerate(table):
        new: list[Action] = []
        for a in row:
            s = a.stage
            prev_remote = s > 0 and owner.get(s - 1, r) != r
            next_remote = s < num_stages - 1 and owner.get(s + 1, r) != r
            if a.kind == "F":
                if prev_remote:
                    new.append(Action(s, "RECV_F", a.mb))
                new.append(a)
                if next_remote:
                    new.append(Action(s, "SEND_F", a.mb))
            elif a.kind == "B":
                if next_remote:
                    new.append(Action(s, "RECV_B", a.mb))
                new.append(a)
                if prev_remote:
                    new.append(Action(s, "SEND_B", a.mb))
            else:
                new.append(a)
        out.append(new)
    return out
