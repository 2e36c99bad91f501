"""GPTQ (Frantar et al.): round one input channel at a time and push its error onto the channels not yet rounded.

Conv weights use the im2col Grams of analysis/conv_gram.py, per group.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from graphquant.analysis.layers import Layer
from graphquant.analysis.simulate import one_blas_thread
from graphquant.analysis.weight_fit import (
    WeightScheme,
    block_rows,
    fit_ranges,
    from_in_major,
    in_major,
    output_error_ranges,
    spec_from_ranges,
)
from graphquant.quant_spec import QuantSpec

if TYPE_CHECKING:
    from graphquant.analysis.conv_gram import PairedMoments

# Rows rounded together before their error is pushed onto the remaining rows in one matrix product.
LAZY_ROWS = 128
# λ/mean diag(X̃^T X̃) of sequential_target's pull towards the float weights (the Gram is often rank-deficient).
TARGET_DAMPING = 0.01
# Inverse-Hessian factors kept by content digest: the layers that read one activation (q, k and v; gate and up) share
# its Gram, and quantize rounds them one after another.
FACTOR_MEMO_ENTRIES = 4
# Factors larger than this are not kept: a 25088-wide Gram's factor alone is 5 GB.
FACTOR_MEMO_BYTES = 64 << 20
# Up to this many input channels, GPTQ's products and factorizations run on one BLAS thread: on a loaded machine
# SmolLM2's q, k, v and down projections took 0.31x the CPU seconds of two threads, with bit-identical weights
# (benchmarks/quant_time_kernels.py).
ONE_THREAD_CHANNELS = 4096
_FACTORS: collections.OrderedDict[str, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()
# Rounded weights kept by content digest, up to this many bytes, inside remembered_roundings() only: a search
# (recipes/auto.py) scores a layer's grids and then builds candidates that round the same layers on the same grids.
ROUNDED_MEMO_BYTES = 512 << 20
_ROUNDED: collections.OrderedDict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = collections.OrderedDict()
_REMEMBERING = [False]


@contextlib.contextmanager
def remembered_roundings() -> Iterator[None]:
    """Within it gptq_round keeps its results by content; leaving the outermost one drops them."""
    outer = _REMEMBERING[0]
    _REMEMBERING[0] = True
    try:
        yield
    finally:
        _REMEMBERING[0] = outer
        if not outer:
            _ROUNDED.clear()


def gram_determined(rows: int, inputs: int, min_rows: float) -> bool:
    """Whether X^T X of ``rows`` calibration rows over ``inputs`` channels is determined enough to round against:
    at least ``min_rows`` rows per input. Below rank, GPTQ pushes each rounding error into directions no calibration
    row reaches, and unseen inputs do (EfficientNet-Lite2's classifier: 140 pooled rows over 1280 inputs)."""
    return rows >= min_rows * inputs


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
    """_gptq_round on one BLAS thread up to ONE_THREAD_CHANNELS, memoized by the content of its arguments inside
    remembered_roundings() (copies are returned)."""
    settings = (bits, symmetric, block, clip_search, act_order, damping)
    with one_blas_thread(gram.shape[0] <= ONE_THREAD_CHANNELS):
        if not _REMEMBERING[0]:
            return _gptq_round(matrix, gram, *settings)
        key = _content_key(matrix, gram, settings)
        if key not in _ROUNDED:
            result = _gptq_round(matrix, gram, *settings)
            if sum(array.nbytes for array in result) > ROUNDED_MEMO_BYTES:
                return result
            _ROUNDED[key] = result
            while sum(array.nbytes for entry in _ROUNDED.values() for array in entry) > ROUNDED_MEMO_BYTES:
                _ROUNDED.popitem(last=False)
    _ROUNDED.move_to_end(key)
    rounded, low, high = _ROUNDED[key]
    return rounded.copy(), low.copy(), high.copy()


def _content_key(matrix: np.ndarray, gram: np.ndarray, settings: tuple[int, bool, int, bool, bool, float]) -> str:
    """A digest of the weights, the Gram and the rounding settings."""
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(f"{matrix.shape} {gram.shape} {settings!r}".encode())
    for array in (matrix, gram):
        hasher.update(np.ascontiguousarray(array, np.float64).reshape(-1).view(np.uint8))
    return hasher.hexdigest()


def _gptq_round(
    matrix: np.ndarray,
    gram: np.ndarray,
    bits: int,
    symmetric: bool,
    block: int,
    clip_search: bool,
    act_order: bool,
    damping: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round [K, N] weights on per-(block, column) grids, minimizing ||X·W - X·Q||^2.

    ``gram`` is X^T X [K, K]. Returns the rounded matrix and the (low, high) ranges of each block, [K/block, N].
    With U the upper Cholesky factor of (X^T X + λI)^-1, rounding row k leaves the error e = (w_k - q_k) / U_kk,
    and the rows after it absorb it: W[k+1:] -= U[k, k+1:]^T ⊗ e. In natural order each block's range is fitted when
    its first row is reached (on the updated rows); with ``act_order`` the rows go by decreasing X^T X diagonal and
    the ranges are fitted on the original weights first ("static groups"), since blocks are then not contiguous.
    """
    weights = matrix.astype(np.float64).copy()
    energy = np.diag(gram).astype(np.float64)[:, None]
    rows = weights.shape[0]
    order, upper = _inverse_factor(gram, act_order, damping)
    # weights of dead rows (diag X^T X = 0) keep their values: rounded to nearest, their error not pushed
    static = fit_ranges(weights, energy, bits, symmetric, block, clip_search) if act_order else None
    weights = weights[order]
    rounded = np.zeros_like(weights)
    lows, highs = ([], []) if static is None else (list(static[0]), list(static[1]))
    grids = [] if static is None else [_Grid(low, high, bits, symmetric) for low, high in zip(*static)]
    # Whole blocks per lazy batch, so that a block's range is fitted on fully updated rows.
    batch = block * max(1, LAZY_ROWS // block)
    for start in range(0, rows, batch):
        end = min(start + batch, rows)
        errors = np.zeros((end - start, weights.shape[1]))
        pending = start  # rows from here on lack the errors of this batch's rows from here on
        for row in range(start, end):
            if static is None and row % block == 0:
                window = slice(row, row + block)
                weights[window] -= upper[start:row, window].T @ errors[: row - start]  # fitted on updated rows
                pending = row
                low, high = fit_ranges(weights[window], energy[order[window]], bits, symmetric, block, clip_search)
                lows.append(low[0])
                highs.append(high[0])
                grids.append(_Grid(low[0], high[0], bits, symmetric))
            grid = grids[order[row] // block if static is not None else len(grids) - 1]
            # the errors of the rows rounded since `pending`, pushed onto this row in one product: W_r -= U[p:r, r]^T E
            weights[row] -= upper[pending:row, row] @ errors[pending - start : row - start]
            rounded[row] = grid.round_trip(weights[row])
            errors[row - start] = (weights[row] - rounded[row]) / upper[row, row]
        weights[end:] -= upper[start:end, end:].T @ errors
    restored = np.empty_like(rounded)
    restored[order] = rounded
    return restored, np.stack(lows), np.stack(highs)


class _Grid:
    """weight_fit.round_trip's grid for one block's (low, high) ranges, its step and zero point computed once."""

    def __init__(self, low: np.ndarray, high: np.ndarray, bits: int, symmetric: bool):
        if symmetric:
            self.qmax = 2 ** (bits - 1) - 1
            self.step = np.maximum(high, 1e-30) / self.qmax
            self.zero_point = None
        else:
            self.qmax = 2**bits - 1
            self.step = np.maximum(high - low, 1e-30) / self.qmax
            self.zero_point = np.clip(np.rint(-low / self.step), 0, self.qmax)

    def round_trip(self, values: np.ndarray) -> np.ndarray:
        """round_trip(values, low, high, bits, symmetric), bit for bit."""
        if self.zero_point is None:
            return np.clip(np.rint(values / self.step), -self.qmax, self.qmax) * self.step
        codes = np.clip(np.rint(values / self.step) + self.zero_point, 0, self.qmax)
        return (codes - self.zero_point) * self.step


def _inverse_factor(gram: np.ndarray, act_order: bool, damping: float) -> tuple[np.ndarray, np.ndarray]:
    """The row order and the upper Cholesky factor U of (H + λI)^-1 in that order (memoized by content)."""
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(f"{gram.shape} {gram.dtype} {act_order} {damping!r}".encode())
    hasher.update(np.ascontiguousarray(gram).reshape(-1).view(np.uint8))
    key = hasher.hexdigest()
    if key not in _FACTORS:
        hessian = gram.astype(np.float64).copy()
        dead = np.diag(hessian) <= 0
        hessian[dead, dead] = 1.0  # their row of H is 0 but the 1: no error is pushed into them
        order = np.argsort(-np.diag(gram), kind="stable") if act_order else np.arange(hessian.shape[0])
        hessian = hessian[np.ix_(order, order)]
        hessian[np.diag_indices_from(hessian)] += damping * float(np.mean(np.diag(hessian)))
        factor = (order, np.linalg.cholesky(np.linalg.inv(hessian)).T)
        if factor[1].nbytes > FACTOR_MEMO_BYTES:
            return factor
        _FACTORS[key] = factor
        while len(_FACTORS) > FACTOR_MEMO_ENTRIES:
            _FACTORS.popitem(last=False)
    _FACTORS.move_to_end(key)
    return _FACTORS[key]


def grouped_gptq_round(
    matrix: np.ndarray,
    grams: np.ndarray,
    bits: int,
    symmetric: bool,
    block: int,
    clip_search: bool,
    act_order: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """gptq_round for a grouped Conv: the output channels (columns) of group g share the Gram grams[g] of its patches."""
    width = matrix.shape[1] // grams.shape[0]
    parts = [
        gptq_round(matrix[:, g * width : (g + 1) * width], gram, bits, symmetric, block, clip_search, act_order)
        for g, gram in enumerate(grams)
    ]
    return tuple(np.concatenate(arrays, axis=1) for arrays in zip(*parts))  # type: ignore[return-value]


def conv_weight_fit(
    layer: Layer, scheme: WeightScheme, grams: np.ndarray, act_order: bool, target: np.ndarray | None = None
) -> tuple[QuantSpec, np.ndarray | None, str]:
    """A Conv weight's spec from its im2col Grams, the rounded weight (None: the spec alone) and a label suffix.

    Depthwise weights (one input channel per group, 9 or 25 weights per output channel) get per-channel grids
    chosen by output error; other convs GPTQ per group. ``target`` (in_major, from sequential_target) replaces the
    weight being rounded; a depthwise weight is then returned too, since it differs from the layer's.
    """
    matrix = in_major(layer) if target is None else target
    if layer.node.op_type == "Conv" and layer.weight_array.shape[1] == 1:
        low, high = output_error_ranges(matrix, grams, scheme.bits, scheme.symmetric)
        spec = spec_from_ranges(layer, scheme, low, high)
        return spec, None if target is None else from_in_major(layer, target), " output-error grids"
    rounded, low, high = grouped_gptq_round(
        matrix, grams, scheme.bits, scheme.symmetric, block_rows(layer, scheme), scheme.clip_search, act_order
    )
    spec = spec_from_ranges(layer, scheme, low, high)
    return spec, from_in_major(layer, rounded), " GPTQ act-order" if act_order else " GPTQ"


def sequential_target(matrix: np.ndarray, moments: PairedMoments, damping: float = TARGET_DAMPING) -> np.ndarray:
    """The weights that best map the quantized model's input onto the float model's output, per group of columns.

    W* = argmin ||X·W - X̃·W*||² + λ||W* - W||² = (X̃^T X̃ + λI)^-1 (X̃^T X·W + λW), λ = damping · mean diag(X̃^T X̃).
    Since X̃(W* - Q) is orthogonal to the residual, ||X·W - X̃·Q||² = const + ||X̃(W* - Q)||²: GPTQ on W* with the
    Gram X̃^T X̃ then rounds against the float model's output, so each layer undoes the error of the layers before it.
    """
    weights = matrix.astype(np.float64)
    width = weights.shape[1] // moments.gram.shape[0]
    target = np.empty_like(weights)
    for g, (gram, cross) in enumerate(zip(moments.gram, moments.cross)):
        columns = slice(g * width, (g + 1) * width)
        strength = damping * max(float(np.mean(np.diag(gram))), 1e-12)
        regularized = gram + strength * np.eye(gram.shape[0])
        target[:, columns] = np.linalg.solve(regularized, cross @ weights[:, columns] + strength * weights[:, columns])
    return target


def mean_shift(matrix: np.ndarray, rounded: np.ndarray, moments: PairedMoments) -> np.ndarray:
    """Per output channel, E[p·W] - E[p̃·Q]: what the bias must gain so that the rounded layer's mean output is the
    float layer's."""
    width = matrix.shape[1] // moments.gram.shape[0]
    shift = np.empty(matrix.shape[1])
    for g in range(moments.gram.shape[0]):
        columns = slice(g * width, (g + 1) * width)
        shift[columns] = moments.float_sum[g] @ matrix[:, columns] - moments.quantized_sum[g] @ rounded[:, columns]
    return shift / max(moments.count, 1)
