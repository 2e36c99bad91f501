"""Flexible Dual Binarization (DB-LLM, Chen et al. 2024): a 2-bit weight as two {0,1} matrices with their own scales.

W ≈ α1·B1 + α2·B2, B1, B2 ∈ {0,1}, α1, α2 one pair per (block of input rows, output column). Each weight takes one
of the four levels {0, α2, α1, α1 + α2}. The start is the paper's: the 2-bit asymmetric grid (q − z)·s, q ∈ 0..3,
whose four levels are exactly these with α1 = ±2s, α2 = ±s. The fit then alternates between the binaries, rounded by
GPTQ onto the four levels against the layer's input Gram H = XᵀX, and the scales, solved by exact least squares
on ‖X(W − Ŵ)‖² = tr(Dᵀ H D), one block of rows at a time. The best pair seen is kept.

Deviation-aware distillation (DAD) reweights the calibration rows: the paper gives ambiguous samples (high teacher
entropy) more weight. A sentence encoder's layers have no class distribution, so here a row's weight is its relative
output deviation under plain 2-bit rounding, e_r = ‖x_r(W − Ŵ_rtn)‖² / ‖x_r W‖², normalized to mean 1: the rows the
2-bit grid distorts most count most, and H becomes Xᵀ diag(e) X.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from graphquant.analysis.gptq import LAZY_ROWS
from graphquant.analysis.weight_fit import fit_ranges, round_trip

# Levels of the 2-bit start grid, and the GPTQ damping (as a fraction of the mean Gram diagonal).
START_BITS = 2
DAMPING = 0.01
# Rows of an activation batch weighted at a time when accumulating the deviation-weighted Gram.
DAD_CHUNK_ROWS = 4096


@dataclasses.dataclass(frozen=True)
class DualBinary:
    """W ≈ α1·B1 + α2·B2 of a [K, N] matrix: binaries [K, N] uint8 in {0,1}, scales [blocks, N] float32."""

    first: np.ndarray
    second: np.ndarray
    alpha1: np.ndarray
    alpha2: np.ndarray
    block: int

    def branch(self, index: int) -> np.ndarray:
        """α_i·B_i as float32 [K, N] (index 0 or 1)."""
        binary, alpha = ((self.first, self.alpha1), (self.second, self.alpha2))[index]
        return binary.astype(np.float32) * expand(alpha, self.block, binary.shape[0])

    def reconstruct(self) -> np.ndarray:
        """α1·B1 + α2·B2 as float32 [K, N]."""
        return self.branch(0) + self.branch(1)


def expand(scales: np.ndarray, block: int, rows: int) -> np.ndarray:
    """[blocks, N] per-block values repeated to [rows, N]."""
    return np.repeat(scales, block, axis=0)[:rows]


def rtn_2bit(matrix: np.ndarray, energy: np.ndarray, block: int, clip_search: bool) -> np.ndarray:
    """Plain 2-bit asymmetric rounding to nearest on the (clip-searched) per-block grid, float64 [K, N]."""
    low, high = fit_ranges(matrix, energy, START_BITS, False, block, clip_search)
    return round_trip(matrix, expand(low, block, matrix.shape[0]), expand(high, block, matrix.shape[0]), 2, False)


def start_scales(matrix: np.ndarray, energy: np.ndarray, block: int, clip_search: bool) -> tuple[np.ndarray, ...]:
    """α1, α2 [blocks, N] whose levels {0, α2, α1, α1 + α2} are the 2-bit grid (q − z)·s of rtn_2bit."""
    low, high = fit_ranges(matrix, energy, START_BITS, False, block, clip_search)
    qmax = 2**START_BITS - 1
    step = np.maximum(high - low, 1e-30) / qmax
    zero = np.clip(np.rint(-low / step), 0, qmax)
    # z = 0: {0, s, 2s, 3s}; z = 1: {-s, 0, s, 2s}; z = 2: {-2s, -s, 0, s}; z = 3: {-3s, -2s, -s, 0}.
    return np.where(zero <= 1, 2 * step, -2 * step), np.where(zero % 2 == 0, step, -step)


def nearest(values: np.ndarray, alpha1: np.ndarray, alpha2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The binaries (b1, b2) whose level α1·b1 + α2·b2 is nearest to each value (ties to the lower code)."""
    levels = np.stack([np.zeros_like(alpha1), alpha2, alpha1, alpha1 + alpha2])
    code = np.argmin(np.abs(values[None] - levels), axis=0)
    return (code >= 2).astype(np.uint8), (code % 2).astype(np.uint8)


def objective(matrix: np.ndarray, hessian: np.ndarray, rebuilt: np.ndarray) -> float:
    """tr(Dᵀ H D), D = W − Ŵ: the layer's summed squared output error on the Gram's rows."""
    difference = matrix - rebuilt
    return float(np.sum(difference * (hessian @ difference)))


def _inverse_factor(hessian: np.ndarray, order: np.ndarray) -> np.ndarray:
    """GPTQ's upper Cholesky factor of (H + λI)^-1 in ``order`` (dead channels get a unit diagonal)."""
    permuted = hessian[np.ix_(order, order)].copy()
    dead = np.diag(permuted) <= 0
    permuted[dead, dead] = 1.0
    permuted[np.diag_indices_from(permuted)] += DAMPING * float(np.mean(np.diag(permuted)))
    return np.linalg.cholesky(np.linalg.inv(permuted)).T


def gptq_assign(
    matrix: np.ndarray, upper: np.ndarray, order: np.ndarray, alpha1: np.ndarray, alpha2: np.ndarray, block: int
) -> tuple[np.ndarray, np.ndarray]:
    """Binaries by GPTQ onto the four levels: each row in ``order`` rounded, its error pushed onto the rows after it."""
    rows = matrix.shape[0]
    weights = matrix.astype(np.float64)[order]
    first, second = (expand(alpha, block, rows)[order] for alpha in (alpha1, alpha2))
    b1, b2 = np.zeros(weights.shape, np.uint8), np.zeros(weights.shape, np.uint8)
    for start in range(0, rows, LAZY_ROWS):
        end = min(start + LAZY_ROWS, rows)
        errors = np.zeros((end - start, weights.shape[1]))
        for row in range(start, end):
            b1[row], b2[row] = nearest(weights[row], first[row], second[row])
            error = (weights[row] - first[row] * b1[row] - second[row] * b2[row]) / upper[row, row]
            weights[row + 1 : end] -= np.outer(upper[row, row + 1 : end], error)
            errors[row - start] = error
        weights[end:] -= upper[start:end, end:].T @ errors
    restored1, restored2 = np.empty_like(b1), np.empty_like(b2)
    restored1[order], restored2[order] = b1, b2
    return restored1, restored2


def refit_scales(
    matrix: np.ndarray,
    hessian: np.ndarray,
    binaries: tuple[np.ndarray, np.ndarray],
    alphas: tuple[np.ndarray, np.ndarray],
    block: int,
    sweeps: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Block coordinate descent on tr(Dᵀ H D) over (α1, α2): per block, the exact 2x2 least-squares step per column.

    With R = H·D, moving block g's scales by δ changes the gradient by H[:, g]·(B_g δ); the step solves
    [p_iᵀ H_gg p_j] δ = [p_iᵀ R_g] for p_1, p_2 the block's binaries, so the error never grows.
    """
    alpha1, alpha2 = (alpha.astype(np.float64).copy() for alpha in alphas)
    p1_all, p2_all = (binary.astype(np.float64) for binary in binaries)
    rows = matrix.shape[0]
    residual = hessian @ (matrix - p1_all * expand(alpha1, block, rows) - p2_all * expand(alpha2, block, rows))
    for _ in range(sweeps):
        for group, start in enumerate(range(0, rows, block)):
            window = slice(start, start + block)
            p1, p2, local = p1_all[window], p2_all[window], hessian[window, window]
            h1, h2 = local @ p1, local @ p2
            a11, a12, a22 = np.sum(p1 * h1, 0), np.sum(p1 * h2, 0), np.sum(p2 * h2, 0)
            g1, g2 = np.sum(p1 * residual[window], 0), np.sum(p2 * residual[window], 0)
            ridge = 1e-9 * float(np.max(a11 + a22, initial=0.0)) + 1e-30  # an empty binary leaves its scale as is
            a11, a22 = a11 + ridge, a22 + ridge
            determinant = a11 * a22 - a12**2
            delta1, delta2 = (a22 * g1 - a12 * g2) / determinant, (a11 * g2 - a12 * g1) / determinant
            alpha1[group] += delta1
            alpha2[group] += delta2
            residual -= hessian[:, window] @ (p1 * delta1 + p2 * delta2)
    return alpha1, alpha2


def dual_binarize(
    matrix: np.ndarray,
    gram: np.ndarray | None,
    block: int,
    clip_search: bool = True,
    act_order: bool = True,
    iterations: int = 3,
) -> DualBinary:
    """FDB of a [K, N] weight against the input Gram XᵀX [K, K] (None: the weights' own squared error).

    Starts from the 2-bit grid; each iteration re-rounds the binaries (GPTQ) and re-solves the scales. The result is
    the iterate with the least tr(Dᵀ H D), never worse than the start grid rounded to nearest.
    """
    weights = matrix.astype(np.float64)
    rows = weights.shape[0]
    hessian = np.eye(rows) if gram is None else gram.astype(np.float64)
    energy = np.maximum(np.diag(hessian), 0.0)[:, None]
    alpha1, alpha2 = start_scales(weights, energy, block, clip_search)
    b1, b2 = nearest(weights, expand(alpha1, block, rows), expand(alpha2, block, rows))
    best = (objective(weights, hessian, _rebuilt(b1, b2, alpha1, alpha2, block)), b1, b2, alpha1, alpha2)
    order = np.argsort(-np.diag(hessian), kind="stable") if act_order else np.arange(rows)
    upper = _inverse_factor(hessian, order)
    for _ in range(iterations):
        b1, b2 = gptq_assign(weights, upper, order, alpha1, alpha2, block)
        alpha1, alpha2 = refit_scales(weights, hessian, (b1, b2), (alpha1, alpha2), block)
        error = objective(weights, hessian, _rebuilt(b1, b2, alpha1, alpha2, block))
        if error < best[0]:
            best = (error, b1, b2, alpha1, alpha2)
    _, b1, b2, alpha1, alpha2 = best
    return DualBinary(b1, b2, alpha1.astype(np.float32), alpha2.astype(np.float32), block)


def _rebuilt(b1: np.ndarray, b2: np.ndarray, alpha1: np.ndarray, alpha2: np.ndarray, block: int) -> np.ndarray:
    """α1·B1 + α2·B2 in float64."""
    rows = b1.shape[0]
    return b1 * expand(alpha1, block, rows) + b2 * expand(alpha2, block, rows)


@dataclasses.dataclass
class DeviationGram:
    """Streams Xᵀ diag(e) X for one layer, e_r the row's relative output deviation under the plain 2-bit weight."""

    weight: np.ndarray
    rounded: np.ndarray
    total: np.ndarray | None = None
    weight_sum: float = 0.0
    count: int = 0

    def add(self, batch: np.ndarray) -> None:
        """Fold a batch of the layer's input (any leading shape, channels last)."""
        rows = batch.reshape(-1, batch.shape[-1])
        for start in range(0, rows.shape[0], DAD_CHUNK_ROWS):
            chunk = rows[start : start + DAD_CHUNK_ROWS].astype(np.float64)
            deviation = deviation_weights(chunk, self.weight, self.rounded)
            product = (chunk * deviation[:, None]).T @ chunk
            self.total = product if self.total is None else self.total + product
            self.weight_sum += float(deviation.sum())
            self.count += chunk.shape[0]

    def gram(self) -> np.ndarray | None:
        """Xᵀ diag(e) X with e normalized to mean 1 over the rows seen (None before any row)."""
        if self.total is None or self.weight_sum <= 0:
            return self.total
        return self.total * (self.count / self.weight_sum)


def deviation_weights(rows: np.ndarray, weight: np.ndarray, rounded: np.ndarray) -> np.ndarray:
    """e_r = ‖x_r (W − Ŵ)‖² / ‖x_r W‖² per row (rows whose exact output is zero get 0)."""
    exact = rows @ weight
    error = exact - rows @ rounded
    power = np.sum(exact**2, axis=1)
    return np.where(power > 0, np.sum(error**2, axis=1) / np.where(power > 0, power, 1.0), 0.0)
