"""BitMoD per-group data types: FP-style grids with one extra value, chosen per group of weights by MSE."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# Every midpoint of every grid below is a multiple of this, so rounding is a table lookup on floor(u / BIN).
BIN = 0.5
# Scale multipliers searched per group and type (1.0: the grid just covers the group's range).
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
GROUP_SIZE = 128


@dataclasses.dataclass(frozen=True)
class GridType:
    """One data type: 2^bits sorted grid values in units of the group scale."""

    name: str
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        """Check that the values are sorted and distinct, hold 0, and have their midpoints on the BIN lattice."""
        grid = np.asarray(self.values, np.float64)
        if np.any(np.diff(grid) <= 0) or 0.0 not in self.values or grid[0] >= 0 or grid[-1] <= 0:
            raise ValueError(f"{self.name}: values must be sorted, distinct, hold 0 and both signs")
        midpoints = (grid[1:] + grid[:-1]) / 2
        if np.any(midpoints / BIN != np.round(midpoints / BIN)):
            raise ValueError(f"{self.name}: midpoints off the {BIN} lattice")

    @property
    def grid(self) -> np.ndarray:
        """The values as float32."""
        return np.asarray(self.values, np.float32)

    def bin_codes(self) -> np.ndarray:
        """Code of the nearest value for each BIN-wide bin from values[0] to values[-1] (ties round up)."""
        grid = np.asarray(self.values, np.float64)
        centres = grid[0] + BIN * (np.arange(round((grid[-1] - grid[0]) / BIN) + 1) + 0.5)
        return np.searchsorted((grid[1:] + grid[:-1]) / 2, centres).astype(np.uint8)


def _extended(name: str, base: Sequence[float], extra: float) -> GridType:
    """The symmetric grid ±base plus one extra value (the code the duplicate zero would waste)."""
    values = {0.0, extra, *base, *(-v for v in base)}
    return GridType(name, tuple(sorted(values)))


FP4_BASE = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)
FP3_BASE = (1.0, 2.0, 4.0)
# Extra resolution (er) fills the widest gap near the top; extra asymmetry (ea) reaches past it on one side.
BITMOD_TYPES: dict[int, tuple[GridType, ...]] = {
    4: (
        _extended("er+", FP4_BASE, 10.0),
        _extended("er-", FP4_BASE, -10.0),
        _extended("ea+", FP4_BASE, 16.0),
        _extended("ea-", FP4_BASE, -16.0),
    ),
    3: (
        _extended("er+", FP3_BASE, 3.0),
        _extended("er-", FP3_BASE, -3.0),
        _extended("ea+", FP3_BASE, 6.0),
        _extended("ea-", FP3_BASE, -6.0),
    ),
}


# Not a default type: as a fifth type on all-MiniLM-L6-v2 it lowered the weight MSE by 1-3% but not the
# embedding error (benchmarks/bitmod_minilm.py), and it would cost a third type-id bit.
def int_type(bits: int) -> GridType:
    """The plain two's-complement integer grid -2^(b-1) .. 2^(b-1)-1."""
    half = 2 ** (bits - 1)
    return GridType(f"int{bits}", tuple(float(v) for v in range(-half, half)))


@dataclasses.dataclass(frozen=True)
class BitModWeight:
    """A [K, N] weight in groups of ``group_size`` rows per column: codes, per-group type ids and scales."""

    codes: np.ndarray
    type_ids: np.ndarray
    scales: np.ndarray
    types: tuple[GridType, ...]
    bits: int
    rows: int

    @property
    def group_size(self) -> int:
        """Rows per group."""
        return self.codes.shape[0] // self.scales.shape[0]

    @property
    def lut(self) -> np.ndarray:
        """The unit grids of all types, concatenated: [n_types * 2^bits] float32."""
        return np.concatenate([t.grid for t in self.types])

    def lut_indices(self) -> np.ndarray:
        """code + type_id * 2^bits per weight, [K_padded, N]."""
        offsets = np.repeat(self.type_ids.astype(np.int32) << self.bits, self.group_size, axis=0)
        return self.codes.astype(np.int32) + offsets

    def dequantize(self) -> np.ndarray:
        """W = lut[index] * scale of the group, in float32 (what the lowered graph computes), [K, N]."""
        scales = np.repeat(self.scales, self.group_size, axis=0)
        return (self.lut[self.lut_indices()] * scales)[: self.rows]

    def type_counts(self) -> dict[str, int]:
        """How many groups chose each type."""
        counts = np.bincount(self.type_ids.ravel(), minlength=len(self.types))
        return {t.name: int(c) for t, c in zip(self.types, counts, strict=True)}


def quantize_weight(
    weight: np.ndarray,
    bits: int,
    group_size: int = GROUP_SIZE,
    clip_ratios: Sequence[float] = CLIP_RATIOS,
    types: Sequence[GridType] | None = None,
) -> BitModWeight:
    """Per group of ``group_size`` rows (zero-padded) of each column, the type and scale of lowest MSE."""
    chosen = tuple(types) if types is not None else BITMOD_TYPES[bits]
    if any(len(t.values) > 2**bits for t in chosen) or not 1 <= len(chosen) <= 2 ** (8 - bits):
        raise ValueError(f"types must have at most 2^{bits} values and fit a uint8 index with their id")
    if group_size < 1 or not clip_ratios or min(clip_ratios) <= 0:
        raise ValueError("group_size and clip ratios must be positive")
    rows, columns = weight.shape
    groups = _groups(weight.astype(np.float32), group_size)
    best_error = np.full(groups.shape[0], np.inf, np.float32)
    best = np.zeros(groups.shape[0], np.int32)
    candidates = [(t, r) for t in chosen for r in clip_ratios]
    for index, (grid_type, ratio) in enumerate(candidates):
        scale = _scale(groups, grid_type, ratio)
        unit = groups / scale[:, None]
        error = np.sum((grid_type.grid[_round(unit, grid_type)] - unit) ** 2, axis=1) * scale**2
        better = error < best_error
        best_error[better] = error[better]
        best[better] = index
    codes = np.zeros(groups.shape, np.uint8)
    scales = np.zeros(groups.shape[0], np.float32)
    for index, (grid_type, ratio) in enumerate(candidates):
        members = best == index
        scales[members] = _scale(groups[members], grid_type, ratio)
        codes[members] = _round(groups[members] / scales[members, None], grid_type)
    type_ids = (best // len(clip_ratios)).astype(np.uint8)
    count = groups.shape[0] // columns
    return BitModWeight(
        codes=codes.reshape(count, columns, group_size).transpose(0, 2, 1).reshape(count * group_size, columns),
        type_ids=type_ids.reshape(count, columns),
        scales=scales.reshape(count, columns),
        types=chosen,
        bits=bits,
        rows=rows,
    )


def _groups(weight: np.ndarray, group_size: int) -> np.ndarray:
    """[K, N] -> [groups * N, group_size]: K zero-padded to a multiple of group_size, one row per group."""
    rows, columns = weight.shape
    padded = -(-rows // group_size) * group_size
    full = np.zeros((padded, columns), np.float32)
    full[:rows] = weight
    return full.reshape(padded // group_size, group_size, columns).transpose(0, 2, 1).reshape(-1, group_size)


def _scale(groups: np.ndarray, grid_type: GridType, ratio: float) -> np.ndarray:
    """ratio * the smallest scale whose grid covers each group: max(max⁺ / top, max⁻ / |bottom|); 1 for zero groups."""
    top, bottom = grid_type.values[-1], -grid_type.values[0]
    cover = np.maximum(np.maximum(groups.max(axis=1), 0) / top, np.maximum(-groups.min(axis=1), 0) / bottom)
    scale = (cover * ratio).astype(np.float32)
    return np.where(scale > np.finfo(np.float32).tiny, scale, np.float32(1.0))


def _round(unit: np.ndarray, grid_type: GridType) -> np.ndarray:
    """Codes of the nearest grid values to ``unit`` (values in scale units), clamped to the grid's range."""
    table = grid_type.bin_codes()
    bins = (unit - grid_type.values[0]) * (1 / BIN)
    return table[np.clip(bins, 0, table.size - 1).astype(np.intp)]
