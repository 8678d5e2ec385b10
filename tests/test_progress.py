"""Rank 0's progress output: a bar only when the launcher itself writes to a terminal."""

from __future__ import annotations

import io
import subprocess
import sys

from mpimp.trainer import _Progress


class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_launcher_writing_to_a_pipe_means_plain_lines() -> None:
    # the child's parent is bash (`; true` keeps it from exec'ing), whose stdout is a pipe,
    # as mpirun's is when a batch job sends it to a log while the rank itself has a pty
    code = "from mpimp.trainer import _launcher_on_terminal as f; print(f())"
    out = subprocess.run(["bash", "-c", f"{sys.executable} -c '{code}'; true"],
                         stdout=subprocess.PIPE, text=True, timeout=120, check=True).stdout
    assert out.strip() == "False"


def test_modes() -> None:
    assert _Progress(10, 5, _FakeTerminal(), mode="bar").tty
    assert not _Progress(10, 5, _FakeTerminal(), mode="lines").tty
    assert not _Progress(10, 5, io.StringIO(), mode="auto").tty  # not a terminal at all
    lines = io.StringIO()
    p = _Progress(10, 5, lines, mode="lines")
    for step in range(10):
        p.update(step, 1.0, 100.0, 0.1)
    assert lines.getvalue().count("\n") == 2 and "\x1b" not in lines.getvalue()
