"""Mixed-precision search: per-unit options with a measured error and a cost, chosen greedily by gain per cost.

Each unit (a layer, or the embedding tables) has options ordered any way; each option carries its error proxy
(the unit's own output noise-to-signal ratio, measured on calibration rows) and its cost under the objective. The
predicted model error is ``gain * sum(proxies) ** power`` plus the errors of options measured end to end (the whole
graph run with only that unit changed): ``gain`` turns per-unit noise into the end-to-end metric, and both are
re-fitted to the end-to-end measurements (per-layer errors do not add exactly; ErrorModel).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Option:
    """One way to run a unit: scheme, error (a proxy, or measured end to end), cost (bytes break ties), bytes,
    timed latency (0: not timed)."""

    scheme: str
    error: float
    cost: float
    size: int
    latency: float = 0.0
    end_to_end: bool = False

    def predicted(self, gain: float) -> float:
        """The option's share of the model's error: gain x the proxy, or the end-to-end measurement as it is."""
        return self.error if self.end_to_end else gain * self.error


@dataclasses.dataclass(frozen=True)
class Unit:
    """A layer or a group of tables that takes one option."""

    name: str
    options: tuple[Option, ...]

    def cheapest(self) -> int:
        """The index of the cheapest option (least cost, then least size, then least error)."""
        return min(range(len(self.options)), key=lambda i: _rank(self.options[i]))


Choice = Mapping[str, int]
# The fitted power of the summed proxies: from a floor-like growth to additive noise.
POWER_RANGE = (0.2, 1.0)


def cheapest(units: Sequence[Unit]) -> dict[str, int]:
    """Every unit at its cheapest option."""
    return {unit.name: unit.cheapest() for unit in units}


def predicted_error(units: Sequence[Unit], choice: Choice, gain: float) -> float:
    """gain x the sum of the chosen options' error proxies, plus their end-to-end measured errors."""
    return sum(unit.options[choice[unit.name]].predicted(gain) for unit in units)


def total(units: Sequence[Unit], choice: Choice, field: str) -> float:
    """The sum of one Option field ("cost", "size" or "latency") over the chosen options."""
    return float(sum(getattr(unit.options[choice[unit.name]], field) for unit in units))


@dataclasses.dataclass(frozen=True)
class ErrorModel:
    """The predicted model error: gain x (summed proxies) ** power + the summed end-to-end errors.

    Layer errors add sub-linearly end to end (their noise partly cancels, and a metric such as a relative error grows
    like its square root): the gain and the power are fitted to the candidates measured so far.
    """

    gain: float
    power: float = 1.0

    def predict(self, units: Sequence[Unit], choice: Choice) -> float:
        """The predicted error of a choice."""
        proxies, measured = proxy_sums(units, choice)
        return self.gain * proxies**self.power + measured

    def slope(self, units: Sequence[Unit], choice: Choice) -> float:
        """The model error added per unit of summed proxy at a choice (the gain that compares unit upgrades)."""
        proxies = proxy_sums(units, choice)[0]
        return self.gain * self.power * proxies ** (self.power - 1) if proxies > 0 else self.gain

    def choose(self, units: Sequence[Unit], budget: float, start: Choice | None = None) -> dict[str, int]:
        """From ``start`` (default: cheapest), upgrade by most predicted error removed per cost until it fits.

        Moves as in greedy, weighed by the slope at the current choice; when none is left the most accurate reachable
        choice is returned.
        """
        choice = dict(start) if start is not None else cheapest(units)
        while self.predict(units, choice) > budget:
            move = best_upgrade(units, choice, self.slope(units, choice))
            if move is None:
                break
            choice[move[0]] = move[1]
        return choice

    def fitted(self, samples: Sequence[tuple[float, float, float]]) -> ErrorModel:
        """Fitted to (summed proxies, summed end-to-end errors, measured error) of built candidates.

        Least squares in log-log space over the samples with positive proxies and excess error (power clamped to
        POWER_RANGE); with one such sample (or equal proxies), the power stays 1 and the gain is the ratio.
        """
        usable = [(p, m - e) for p, e, m in samples if p > 0 and m - e > 0]
        if not usable:
            return self
        logs = np.log(np.array(usable, np.float64))
        if len(usable) >= 2 and np.ptp(logs[:, 0]) > 0:
            slope = float(np.cov(logs[:, 0], logs[:, 1], bias=True)[0, 1] / np.var(logs[:, 0]))
            power = min(max(slope, POWER_RANGE[0]), POWER_RANGE[1])
            return ErrorModel(float(np.exp(np.mean(logs[:, 1] - power * logs[:, 0]))), power)
        return ErrorModel(float(np.exp(np.mean(logs[:, 1] - logs[:, 0]))), 1.0)

    def anchored(self, sample: tuple[float, float, float]) -> ErrorModel:
        """The same power, with the gain that predicts one (summed proxies, end-to-end errors, measured error) exactly.

        Next to the candidate last measured, its own error is the best evidence: the fit over every sample (the gain
        probes are small, few-layer models) can predict a built candidate short of what it measured.
        """
        proxies, measured_parts, measured = sample
        if proxies <= 0 or measured - measured_parts <= 0:
            return self
        return ErrorModel((measured - measured_parts) / proxies**self.power, self.power)


def proxy_sums(units: Sequence[Unit], choice: Choice) -> tuple[float, float]:
    """(summed error proxies, summed end-to-end errors) of a choice: what ErrorModel.fitted takes with a measurement."""
    chosen = [unit.options[choice[unit.name]] for unit in units]
    return (
        float(sum(o.error for o in chosen if not o.end_to_end)),
        float(sum(o.error for o in chosen if o.end_to_end)),
    )


def greedy(units: Sequence[Unit], budget: float, gain: float, start: Choice | None = None) -> dict[str, int]:
    """From ``start`` (default: cheapest), upgrade by most error removed per cost added until the prediction fits.

    A move replaces one unit's option by one with less error; free moves (no added cost) come first. When no move is
    left the most accurate reachable choice is returned (the caller verifies it anyway).
    """
    return ErrorModel(gain).choose(units, budget, start)


def best_upgrade(units: Sequence[Unit], choice: Choice, gain: float) -> tuple[str, int] | None:
    """The (unit, option) upgrade with the largest predicted error reduction per added cost, or None."""
    best: tuple[float, float, str, int] | None = None
    for unit in units:
        current = unit.options[choice[unit.name]]
        for index, option in enumerate(unit.options):
            removed = current.predicted(gain) - option.predicted(gain)
            if removed <= 0:
                continue
            added = max(option.cost - current.cost, 0.0) + 1e-9 * max(option.size - current.size, 0)
            score = removed / added if added > 0 else float("inf")
            key = (score, removed, unit.name, index)
            if best is None or key[:2] > best[:2]:
                best = key
    return None if best is None else (best[2], best[3])


def cheaper_step(units: Sequence[Unit], choice: Choice, gain: float) -> tuple[dict[str, int], float] | None:
    """The one-unit downgrade adding the least predicted error per cost saved, with that added error, or None."""
    best: tuple[float, float, str, int] | None = None
    for unit in units:
        current = unit.options[choice[unit.name]]
        for index, option in enumerate(unit.options):
            saved = current.cost - option.cost
            if saved <= 0:
                continue
            added = max(option.predicted(gain) - current.predicted(gain), 0.0)
            key = (added / saved, added, unit.name, index)
            if best is None or key[:2] < best[:2]:
                best = key
    return None if best is None else ({**choice, best[2]: best[3]}, best[1])


def cheaper_steps(units: Sequence[Unit], choice: Choice, gain: float, allowance: float) -> dict[str, int] | None:
    """Successive cheaper steps while their summed predicted added error stays within ``allowance`` (None if none)."""
    stepped, spent = dict(choice), 0.0
    while (step := cheaper_step(units, stepped, gain)) is not None and spent + step[1] <= allowance:
        stepped, spent = step[0], spent + step[1]
    return stepped if stepped != choice else None


def repeated_block(keys: Sequence[Hashable], min_repeats: int = 3) -> tuple[int, int, int] | None:
    """(period, start, stop) of the longest stretch of ``keys`` that repeats a block of 2 or more, min_repeats times.

    Ties go to the shorter period (a multiple of the true period repeats the same stretch). None when nothing does.
    """
    best: tuple[int, int, int] | None = None
    for period in range(2, len(keys) // min_repeats + 1):
        start = 0
        while start < len(keys) - period:
            end = start
            while end < len(keys) - period and keys[end] == keys[end + period]:
                end += 1
            stop = end + period
            if (
                end > start
                and stop - start >= min_repeats * period
                and (best is None or stop - start > best[2] - best[1])
            ):
                best = (period, start, stop)
            start = end + 1
    return best


def separable_gains(
    proxies: np.ndarray, row_errors: np.ndarray, column_errors: np.ndarray, rounds: int = 200
) -> np.ndarray:
    """Gains row[i] x column[j] that turn a grid of summed proxies into each row's and each column's measured error.

    Iterative proportional fitting (matrix scaling). The two sets of measurements are of different builds, so their
    totals differ: both are first scaled to their geometric mean total.
    """
    rows, columns = np.asarray(row_errors, np.float64), np.asarray(column_errors, np.float64)
    if rows.sum() <= 0 or columns.sum() <= 0:
        return np.zeros_like(proxies, dtype=np.float64)
    total = math.sqrt(rows.sum() * columns.sum())
    rows, columns = rows * total / rows.sum(), columns * total / columns.sum()
    row_gain, column_gain = np.ones(len(rows)), np.ones(len(columns))
    for _ in range(rounds):
        column_gain = columns / np.maximum(row_gain @ proxies, 1e-300)
        row_gain = rows / np.maximum(proxies @ column_gain, 1e-300)
    return row_gain[:, None] * column_gain[None, :]


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
