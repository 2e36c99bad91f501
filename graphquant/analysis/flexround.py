"""FlexRound (Lee et al.): learnable weight rounding by element-wise division, fitted to a layer's output error.

W_q = s · round(W / (s · S)), S = exp(S1 + r + c): S1 element-wise, r per output channel, c per input channel, and
the grid s (per channel or block) learned too, in log space. The loss is the exact layer-output error
||X·W - X·W_q||² = tr(Dᵀ·XᵀX·D), D = W - W_q, so only the Gram XᵀX of the calibration inputs is needed, never X.
Rounding passes straight-through gradients, written out in numpy (Adam, its learning rate decaying on a cosine).
The codes kept are those of the least loss seen, the first being the start's (RTN's or GPTQ's), so the result is
never worse on the (damped) calibration Gram than where it starts. The stored grid stays
s per channel or block with the starting zero point: every lowering takes the result unchanged.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from graphquant.analysis.weight_fit import fit_ranges

# Larger learning rates flip many codes at once and lose more than they gain.
DEFAULT_STEPS = 300
DEFAULT_LEARNING_RATE = 1e-3
# Past this many K x flips elements, H·codes is recomputed whole rather than updated where codes flipped.
UPDATE_ELEMENTS = 1 << 22
# Added to the Gram's diagonal, times its mean diagonal: inputs the calibration data never spanned cost a little.
DAMPING = 0.01


@dataclasses.dataclass(frozen=True)
class FlexRoundSettings:
    """Adam's steps and learning rate (the start is fixed and nothing is sampled: no seed is needed)."""

    steps: int = DEFAULT_STEPS
    learning_rate: float = DEFAULT_LEARNING_RATE

    def __post_init__(self) -> None:
        if self.steps < 1 or not self.learning_rate > 0:
            raise ValueError(f"flexround needs steps >= 1 and a positive learning rate, got {self}")


@dataclasses.dataclass(frozen=True)
class Grid:
    """Per (block, column) [blocks, N]: the step and the code range [lower, upper] around the zero point."""

    step: np.ndarray
    lower: np.ndarray
    upper: np.ndarray

    @classmethod
    def of_ranges(cls, low: np.ndarray, high: np.ndarray, bits: int, symmetric: bool) -> Grid:
        """The grid weight_fit.round_trip rounds onto for the ranges (low, high), codes counted from zero."""
        if symmetric:
            qmax = 2 ** (bits - 1) - 1
            step = np.maximum(high, 1e-30) / qmax
            return cls(step, np.full(step.shape, -qmax, np.float64), np.full(step.shape, qmax, np.float64))
        qmax = 2**bits - 1
        step = np.maximum(high - low, 1e-30) / qmax
        zero_point = np.clip(np.rint(-low / step), 0, qmax)
        return cls(step, -zero_point, qmax - zero_point)


def flexround_round(
    matrix: np.ndarray,
    gram: np.ndarray,
    bits: int,
    symmetric: bool,
    block: int,
    clip_search: bool,
    settings: FlexRoundSettings = FlexRoundSettings(),
    start: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round [K, N] weights on per-(block, column) grids, minimizing ||X·W - X·Q||² given ``gram`` = XᵀX [K, K].

    The grids start from RTN's (``clip_search``: the clip search, weighted by the Gram's diagonal), or from
    ``start``: a rounded matrix with its ranges (GPTQ's), whose codes the divisors S then reproduce where the sign
    allows. Returns the rounded matrix and the (low, high) ranges of each block [K/block, N], as gptq_round does.
    """
    weights = np.asarray(matrix, np.float64)
    if start is None:
        energy = np.maximum(np.diag(gram).astype(np.float64), 0.0)[:, None]
        low, high = fit_ranges(weights, energy, bits, symmetric, block, clip_search)
    else:
        low, high = start[1], start[2]
    grid = Grid.of_ranges(low, high, bits, symmetric)
    step = rows_of(grid.step, block, weights.shape[0])
    codes = None if start is None else np.rint(start[0] / step)
    factor, codes = _train(weights, damped(gram), grid, block, settings, codes)
    return rows_of(grid.step * factor, block, weights.shape[0]) * codes, low * factor, high * factor


def damped(gram: np.ndarray) -> np.ndarray:
    """The Gram in float64 with DAMPING times its mean diagonal added to the diagonal."""
    hessian = np.array(gram, np.float64)
    hessian[np.diag_indices_from(hessian)] += DAMPING * max(float(np.mean(np.diag(hessian))), 1e-30)
    return hessian


def rows_of(per_block: np.ndarray, block: int, rows: int) -> np.ndarray:
    """[blocks, N] values repeated over the ``block`` rows of each block, cut to ``rows`` rows."""
    return np.repeat(per_block, block, axis=0)[:rows]


def divisors(ratio: np.ndarray, codes: np.ndarray, reach: float = 0.0) -> np.ndarray:
    """log S such that ratio / S rounds to ``codes``, or to 0 where the code's sign differs.

    ratio / S lands at most ``reach`` (< 0.5) from the code, as near to ``ratio`` as that allows (0: on the code).
    """
    same_sign = (codes != 0) & (np.sign(codes) == np.sign(ratio))
    # Where the code cannot be reached (a sign flip, or 0), aim inside the zero bin.
    zero_bin = max(reach, 0.25)
    target = np.where(same_sign, np.clip(ratio, codes - reach, codes + reach), np.clip(ratio, -zero_bin, zero_bin))
    with np.errstate(divide="ignore", invalid="ignore"):
        log_s = np.log(ratio / target)
    return np.where(np.isfinite(log_s), log_s, 0.0)


class _Adam:
    """Adam (Kingma and Ba) on a list of float32 arrays, updated in place, the learning rate given per step."""

    def __init__(self, parameters: list[np.ndarray]):
        self.parameters = parameters
        self.moments = [(np.zeros_like(p), np.zeros_like(p)) for p in parameters]
        self.count = 0

    def step(
        self, gradients: list[np.ndarray], learning_rate: float, betas: tuple[float, float] = (0.9, 0.999)
    ) -> None:
        """One update: bias-corrected first and second moments, epsilon 1e-8."""
        self.count += 1
        first_fix, second_fix = 1 - betas[0] ** self.count, 1 - betas[1] ** self.count
        for parameter, gradient, (first, second) in zip(self.parameters, gradients, self.moments):
            first += (1 - betas[0]) * (gradient - first)
            second += (1 - betas[1]) * (gradient * gradient - second)
            parameter -= learning_rate * (first / first_fix) / (np.sqrt(second / second_fix) + 1e-8)


def _train(
    weights: np.ndarray,
    hessian: np.ndarray,
    grid: Grid,
    block: int,
    settings: FlexRoundSettings,
    start_codes: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Adam on (log grid factor, S1, r, c); the grid factor [blocks, N] and integer codes [K, N] of the least loss.

    ``start_codes`` are the first candidate, and S1 starts where it reproduces them. On per-channel grids
    H·W_q = (H·codes)·s, and H·codes is updated only where codes flipped: a step costs K·flips·N', not K²·N.
    """
    rows, columns = weights.shape
    w = weights.astype(np.float32)
    h = (hessian / max(float(np.mean(np.diag(hessian))), 1e-30)).astype(np.float32)
    step, lower, upper = (rows_of(a, block, rows).astype(np.float32) for a in (grid.step, grid.lower, grid.upper))
    log_grid = np.zeros(grid.step.shape, np.float32)
    element = np.zeros((rows, columns), np.float32)
    best = (np.inf, log_grid.copy(), np.zeros_like(w))
    if start_codes is not None:
        error = w - step * start_codes.astype(np.float32)
        best = (float(np.sum(error * (h @ error))), log_grid.copy(), start_codes.astype(np.float32))
        element = divisors(weights / rows_of(grid.step, block, rows), start_codes).astype(np.float32)
    product, previous, weight_product = np.zeros_like(w), np.zeros_like(w), h @ w
    per_output = np.zeros((1, columns), np.float32)
    per_input = np.zeros((rows, 1), np.float32)
    adam = _Adam([log_grid, element, per_output, per_input])
    for index in range(settings.steps):
        scale = step * np.exp(rows_of(log_grid, block, rows))
        ratio = w / (scale * np.exp(element + per_output + per_input))
        rounded = np.rint(ratio)
        codes = np.clip(rounded, lower, upper)
        error = w - scale * codes
        if log_grid.shape[0] == 1:
            product, previous = _updated_product(h, product, codes, previous), codes
            pulled = 2 * (weight_product - product * scale[:1])  # dL/d error = 2·H·error
        else:
            pulled = 2 * (h @ error)
        loss = float(np.sum(error * pulled)) / 2
        if loss < best[0]:
            best = (loss, log_grid.copy(), codes)
        # Straight through round (d code / d ratio = 1 inside the code range, 0 where clipped):
        # dL/d log S = pulled·scale·ratio, dL/d log scale = pulled·scale·(ratio - code).
        passing = ((rounded >= lower) & (rounded <= upper)).astype(np.float32)
        through_divisor = pulled * scale * ratio * passing
        through_scale = pulled * scale * (ratio * passing - codes)
        gradients = [
            _block_sums(through_scale, block),
            through_divisor,
            through_divisor.sum(axis=0, keepdims=True),
            through_divisor.sum(axis=1, keepdims=True),
        ]
        adam.step(gradients, settings.learning_rate * 0.5 * (1 + np.cos(np.pi * index / settings.steps)))
    return np.exp(best[1].astype(np.float64)), best[2].astype(np.float64)


def _updated_product(h: np.ndarray, product: np.ndarray, codes: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """H·codes from H·previous (``product``, updated in place), through the entries that changed."""
    rows, columns = np.nonzero(codes != previous)
    if rows.size * h.shape[0] > UPDATE_ELEMENTS:
        return h @ codes
    np.add.at(product, (slice(None), columns), h[:, rows] * (codes - previous)[rows, columns])
    return product


def _block_sums(values: np.ndarray, block: int) -> np.ndarray:
    """[K, N] values summed over each block of ``block`` rows: [blocks, N]."""
    return np.add.reduceat(values, np.arange(0, values.shape[0], block), axis=0)
