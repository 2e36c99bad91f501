"""GPTQ (Frantar et al.): round one input channel at a time and push its error onto the channels not yet rounded."""

from __future__ import annotations

import numpy as np

from graphquant.analysis.weight_fit import fit_ranges, round_trip

# Rows rounded together before their error is pushed onto the remaining rows in one matrix product.
LAZY_ROWS = 128


def gptq_round(
    matrix: np.ndarray,
    gram: np.ndarray,
    bits: int,
    symmetric: bool,
    block: int,
    clip_search: bool,
    act_order: bool = False,
    damping: float = 0.01,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round [K, N] weights on per-(block, column) grids, minimizing ||X·W - X·Q||^2.

    ``gram`` is X^T X [K, K]. Returns the rounded matrix and the (low, high) ranges of each block, [K/block, N].
    With U the upper Cholesky factor of (X^T X + λI)^-1, rounding row k leaves the error e = (w_k - q_k) / U_kk,
    and the rows after it absorb it: W[k+1:] -= U[k, k+1:]^T ⊗ e. In natural order each block's range is fitted when
    its first row is reached (on the updated rows); with ``act_order`` the rows go by decreasing X^T X diagonal and
    the ranges are fitted on the original weights first ("static groups"), since blocks are then not contiguous.
    """
    weights = matrix.astype(np.float64).copy()
    hessian = gram.astype(np.float64).copy()
    dead = np.diag(hessian) <= 0
    hessian[dead, dead] = 1.0
    weights[dead] = 0.0
    energy = np.diag(gram).astype(np.float64)[:, None]
    rows = weights.shape[0]
    order = np.argsort(-np.diag(gram), kind="stable") if act_order else np.arange(rows)
    static = fit_ranges(weights, energy, bits, symmetric, block, clip_search) if act_order else None
    weights, hessian = weights[order], hessian[np.ix_(order, order)]
    hessian[np.diag_indices_from(hessian)] += damping * float(np.mean(np.diag(hessian)))
    upper = np.linalg.cholesky(np.linalg.inv(hessian)).T
    rounded = np.zeros_like(weights)
    lows, highs = ([], []) if static is None else (list(static[0]), list(static[1]))
    # Whole blocks per lazy batch, so that a block's range is fitted on fully updated rows.
    batch = block * max(1, LAZY_ROWS // block)
    for start in range(0, rows, batch):
        end = min(start + batch, rows)
        errors = np.zeros((end - start, weights.shape[1]))
        for row in range(start, end):
            if static is None and row % block == 0:
                window = slice(row, row + block)
                low, high = fit_ranges(weights[window], energy[order[window]], bits, symmetric, block, clip_search)
                lows.append(low[0])
                highs.append(high[0])
            index = order[row] // block if static is not None else len(lows) - 1
            rounded[row] = round_trip(weights[row], lows[index], highs[index], bits, symmetric)
            error = (weights[row] - rounded[row]) / upper[row, row]
            weights[row + 1 : end] -= np.outer(upper[row, row + 1 : end], error)
            errors[row - start] = error
        weights[end:] -= upper[start:end, end:].T @ errors
    restored = np.empty_like(rounded)
    restored[order] = rounded
    return restored, np.stack(lows), np.stack(highs)
