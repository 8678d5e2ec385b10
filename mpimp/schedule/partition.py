"""Cutting a sequence of layers into contiguous pipeline stages.

Problem: a stage that holds more work than the others sets the pace of the whole
pipeline, and a stage with no layer cannot run at all.  ``balance`` (layers per stage,
in model order) is either given, checked here with the numbers in the error, or found by
:func:`balance_by_cost`: the contiguous split of per-layer costs (parameter counts or
measured forward+backward times) that minimises the most expensive stage (exact
dynamic programme, O(stages x layers^2)).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import ConfigError

__all__ = ["balance_by_cost", "check_balance", "stage_bounds"]


def balance_by_cost(costs: Sequence[float], num_stages: int) -> list[int]:
    """Layers per stage (each >= 1) minimising the maximum stage cost; ties keep earlier stages lighter."""
    n = len(costs)
    if num_stages > n:
        raise ConfigError(
            f"{num_stages} pipeline stages but the model has only {n} layers; use at most {n} "
            f"stages (pp x virtual_stages) or split the model into more layers"
        )
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[k][j]: minimal max-cost of splitting layers[:j] into k stages; cut[k][j]: start of the last stage
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for j in range(k, n - (num_stages - k) + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], prefix[j] - prefix[i])
                if value < best[k][j] - 1e-12:
                    best[k][j], cut[k][j] = value, i
    sizes, j = [], n
    for k in range(num_stages, 0, -1):
        i = cut[k][j]
        sizes.append(j - i)
        j = i
    return sizes[::-1]


def check_balance(balance: object, num_layers: int, num_stages: int) -> list[int]:
    """Validate a user balance: ``num_stages`` positive integers summing to ``num_layers``."""
    if num_stages > num_layers:
        raise ConfigError(
            f"{num_stages} pipeline stages but the model has only {num_layers} layers; use at most "
            f"{num_layers} stages (pp x virtual_stages) or split the model into more layers"
        )
    if not isinstance(balance, (list, tuple)) or not all(
        isinstance(b, int) and not isinstance(b, bool) for b in balance
    ):
        raise ConfigError(f"balance={balance!r} must be a list of integers (layers per stage), "
                          f"None (by parameter count) or 'time'")
    if len(balance) != num_stages:
        raise ConfigError(
            f"balance has {len(balance)} entries but there are {num_stages} stages "
            f"(pp x virtual_stages); give one layer count per stage, in model order"
        )
    empty = [i for i, b in enumerate(balance) if b < 1]
    if empty:
        raise ConfigError(f"balance={list(balance)} leaves stage {empty[0]} with {balance[empty[0]]} layers; "
                          f"every stage needs at least one layer")
    if sum(balance) != num_layers:
        raise ConfigError(
            f"balance={list(balance)} sums to {sum(balance)} but the model has {num_layers} layers; "
            f"the counts must add up to {num_layers}"
        )
    return list(balance)


def stage_bounds(balance: Sequence[int]) -> list[tuple[int, int]]:
    """``[start, end)`` layer indices of each stage."""
    out, start = [], 0
    for b in balance:
        out.append((start, start + b))
        start += b
    return out
