"""Mixed-precision search: per-unit options with a measured error and a cost, chosen greedily by gain per cost.

Each unit (a layer, or the embedding tables) has options ordered any way; each option carries its error proxy
(the unit's own output noise-to-signal ratio, measured on calibration rows) and its cost under the objective. The
predicted model error is ``gain * sum(errors)``: ``gain`` turns per-unit noise into the end-to-end metric and is
re-fitted from each end-to-end measurement (per-layer errors do not add exactly).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class Option:
    """One way to run a unit: scheme, error proxy, cost (bytes break ties), bytes, timed latency (0: not timed)."""

    scheme: str
    error: float
    cost: float
    size: int
    latency: float = 0.0


@dataclasses.dataclass(frozen=True)
class Unit:
    """A layer or a group of tables that takes one option."""

    name: str
    options: tuple[Option, ...]

    def cheapest(self) -> int:
        """The index of the cheapest option (least cost, then least size, then least error)."""
        return min(range(len(self.options)), key=lambda i: _rank(self.options[i]))


Choice = Mapping[str, int]


def cheapest(units: Sequence[Unit]) -> dict[str, int]:
    """Every unit at its cheapest option."""
    return {unit.name: unit.cheapest() for unit in units}


def predicted_error(units: Sequence[Unit], choice: Choice, gain: float) -> float:
    """gain x the sum of the chosen options' error proxies."""
    return gain * sum(unit.options[choice[unit.name]].error for unit in units)


def total(units: Sequence[Unit], choice: Choice, field: str) -> float:
    """The sum of one Option field ("cost", "size" or "latency") over the chosen options."""
    return float(sum(getattr(unit.options[choice[unit.name]], field) for unit in units))


def greedy(units: Sequence[Unit], budget: float, gain: float, start: Choice | None = None) -> dict[str, int]:
    """From ``start`` (default: cheapest), upgrade by most error removed per cost added until the prediction fits.

    A move replaces one unit's option by one with less error; free moves (no added cost) come first. When no move is
    left the most accurate reachable choice is returned (the caller verifies it anyway).
    """
    choice = dict(start) if start is not None else cheapest(units)
    while predicted_error(units, choice, gain) > budget:
        move = _best_move(units, choice)
        if move is None:
            break
        choice[move[0]] = move[1]
    return choice


def _best_move(units: Sequence[Unit], choice: Choice) -> tuple[str, int] | None:
    """The (unit, option) upgrade with the largest error reduction per added cost, or None."""
    best: tuple[float, float, str, int] | None = None
    for unit in units:
        current = unit.options[choice[unit.name]]
        for index, option in enumerate(unit.options):
            removed = current.error - option.error
            if removed <= 0:
                continue
            added = max(option.cost - current.cost, 0.0) + 1e-9 * max(option.size - current.size, 0)
            score = removed / added if added > 0 else float("inf")
            key = (score, removed, unit.name, index)
            if best is None or key[:2] > best[:2]:
                best = key
    return None if best is None else (best[2], best[3])


def more_accurate(units: Sequence[Unit], choice: Choice, unit_name: str) -> int | None:
    """The cheapest option of a unit with less error than its current one (one back-off step), or None."""
    unit = next(u for u in units if u.name == unit_name)
    current = unit.options[choice[unit_name]]
    better = [i for i, option in enumerate(unit.options) if option.error < current.error]
    return min(better, key=lambda i: _rank(unit.options[i])) if better else None


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (error, cost) points no other point beats on both (ties kept), by ascending cost."""
    front = [
        i
        for i, (error, cost) in enumerate(points)
        if not any(e <= error and c <= cost and (e, c) != (error, cost) for e, c in points)
    ]
    return sorted(front, key=lambda i: (points[i][1], points[i][0]))


def _rank(option: Option) -> tuple[float, int, float]:
    """Ordering of options by cheapness."""
    return (option.cost, option.size, option.error)
