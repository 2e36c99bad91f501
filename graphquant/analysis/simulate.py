"""Fake-quantization of one scale group on sampled rows, to choose schemes by measured output error."""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Sequence

import numpy as np
from threadpoolctl import ThreadpoolController

from graphquant.analysis.integer_matmul import integer_matmul
from graphquant.analysis.layers import Layer
from graphquant.rewrites import layer_bias

# Output channels scored per layer: evenly spaced, so that a 49152-wide lm_head costs what a 256-wide layer does
# (a preset scores about 20 schemes on each of 121 groups of SmolLM2; 1024 columns made that 40% of its time).
MAX_SCORED_COLUMNS = 256


def one_blas_thread(when: bool = True) -> contextlib.AbstractContextManager[object]:
    """BLAS on one thread (``when`` it is True), for runs of small products: on a loaded machine, waiting for a second
    thread made the screen's 128-row GEMMs cost more than the full 1024-row scoring (benchmarks/search_screen.py's CPU
    seconds)."""
    return _blas_controller().limit(limits=1, user_api="blas") if when else contextlib.nullcontext()


@functools.cache
def _blas_controller() -> ThreadpoolController:
    """The thread pools of the BLAS libraries loaded (looked up once)."""
    return ThreadpoolController()


def fake_quantize(values: np.ndarray, step: np.ndarray | float, bits: int) -> np.ndarray:
    """Symmetric round-to-nearest on a grid of the given step, clamped to the restricted signed range."""
    qmax = 2 ** (bits - 1) - 1
    return np.clip(np.rint(values / step), -qmax, qmax) * step


def weight_matrix(layer: Layer) -> np.ndarray:
    """The weight as [C_in, C_out], a view of the stored array (no copy of a large weight)."""
    weight = layer.weight_array
    return weight if layer.in_axis == 0 else weight.T


def scored_columns(columns: int, limit: int = MAX_SCORED_COLUMNS) -> np.ndarray:
    """At most ``limit`` evenly spaced output-channel indices (all of them for a narrow layer)."""
    return np.arange(columns) if columns <= limit else np.linspace(0, columns - 1, limit).round().astype(np.int64)


class GroupSimulator:
    """One group's sampled rows, weights and float outputs, computed once and reused for every scheme it scores.

    The layers' scored columns sit side by side in one matrix, so that each scheme costs one GEMM for the group.
    """

    def __init__(self, rows: np.ndarray, layers: Sequence[Layer], max_columns: int = MAX_SCORED_COLUMNS):
        # float32 GEMMs: twice the speed of float64, and the SQNR needs no more than float32's 7 digits.
        self.rows = np.ascontiguousarray(rows, dtype=np.float32)
        weights, biases = [], []
        for layer in layers:
            weight = weight_matrix(layer)
            columns = scored_columns(weight.shape[1], max_columns)
            weights.append(weight[:, columns])
            biases.append(layer_bias(layer)[columns])
        self.weight = np.ascontiguousarray(np.concatenate(weights, axis=1), dtype=np.float32)
        self.bias = np.concatenate(biases).astype(np.float32)
        self.product = self.rows @ self.weight  # X·W; the float output is X·W + b
        self._prepare()

    def every(self, stride: int) -> GroupSimulator:
        """This simulator on every ``stride``-th row: the same weights, the product sliced (no GEMM)."""
        subset = copy.copy(self)
        subset.rows = np.ascontiguousarray(self.rows[::stride])
        subset.product = np.ascontiguousarray(self.product[::stride])
        subset._prepare()
        return subset

    def _prepare(self) -> None:
        """What every scheme reuses: the signal, the rows' per-channel ranges and scratch buffers for one scoring."""
        self.signal = self._signal()
        self._float_paths: dict[bytes, np.ndarray] = {}
        self._channel_min, self._channel_max = self.rows.min(axis=0), self.rows.max(axis=0)
        self._scaled = np.empty_like(self.rows)
        self._migrated = np.empty_like(self.weight)
        self._error = np.empty_like(self.product)
        self._unsigned_codes = np.empty(self.rows.shape, np.uint8)
        self._weight_codes = np.empty(self.weight.shape, np.int8)

    def _signal(self) -> np.ndarray:
        """The per-column energy of the float output X·W + b (the SQNR's signal)."""
        return np.maximum(np.sum(np.square(self.product + self.bias, dtype=np.float64), axis=0), 1e-30)

    def sqnr_db(
        self,
        divisor: np.ndarray,
        abits: int,
        wbits: int,
        activation_step: float | None = None,
        float_channels: np.ndarray | None = None,
        per_row: bool = False,
        asymmetric: bool = False,
    ) -> float:
        """Channel-averaged output SQNR with X/divisor quantized and W·divisor per column.

        The activation step is the given one, else one per row (``per_row``: the run-time per-token scale), else one
        per tensor: ±max|x| on the signed grid, or [min, max] on the unsigned one with a zero point (``asymmetric``).
        The divisor must be nonzero in every channel. The per-tensor range comes from the rows' per-channel ranges
        (division by a nonzero constant is monotone, so it is the range of X/divisor itself, to the bit).
        """
        divisor = divisor.astype(np.float32)
        if not np.all(divisor):
            raise ValueError("the divisor must be nonzero in every channel")
        scaled = np.divide(self.rows, divisor, out=self._scaled)
        if float_channels is not None:
            scaled[:, float_channels] = 0  # those channels go through an exact float MatMul
        qmax = 2 ** (abits - 1) - 1
        step: np.ndarray | float
        if asymmetric and activation_step is None and not per_row:
            low, high = self._scaled_range(divisor, float_channels)
            step, zero = _asymmetric_grid(low, high, abits)
            codes = _codes_in_place(scaled, step, -zero, 2**abits - 1 - zero)
        else:
            if activation_step is not None:
                step = activation_step
            elif per_row:
                step = _row_steps(scaled, qmax)
            else:
                low, high = self._scaled_range(divisor, float_channels)
                step = max(-low, high, 1e-12) / qmax
            zero = 2 ** (abits - 1)  # the codes' offset onto the unsigned grid
            codes = _codes_in_place(scaled, step, -qmax, qmax)
        migrated = np.multiply(self.weight, divisor[:, None], out=self._migrated)
        if float_channels is not None:
            migrated[float_channels, :] = 0
        wmax = 2 ** (wbits - 1) - 1
        column_step = np.maximum(_column_absmax(migrated), 1e-12) / wmax
        weight_codes = _codes_in_place(migrated, column_step[None, :], -wmax, wmax)
        # The bias counts in the signal (after a shift it cancels part of X·W), not in the error: X·W - X_q·W_q, with
        # X_q·W_q = s_x (C_x·C_w) s_w and the product of the integer codes C exact.
        product = self._code_product(codes, zero, weight_codes, max(abits, wbits))
        error = np.multiply(product, column_step, out=self._error, dtype=np.float32)
        if not (isinstance(step, float) and step == 1.0):
            np.multiply(error, step, out=error)
        if float_channels is not None:
            error += self._float_path(float_channels)
        np.subtract(self.product, error, out=error)
        # Each output channel's relative error counts equally: a few huge channels must not hide the error in the rest.
        mean_error = float(np.mean(np.einsum("ij,ij->j", error, error) / self.signal))
        return math.inf if mean_error == 0 else -10.0 * math.log10(mean_error)

    def _code_product(self, codes: np.ndarray, zero: int, weight_codes: np.ndarray, bits: int) -> np.ndarray:
        """codes·weight_codes, both integer-valued float32 (codes + zero within [0, 2**bits - 1], weight codes
        signed): exact in int32 on the integer GEMM up to 8 bits, in float32 above."""
        if bits > 8:
            return codes @ weight_codes
        np.add(codes, zero, out=self._unsigned_codes, casting="unsafe")
        np.copyto(self._weight_codes, weight_codes, casting="unsafe")
        return integer_matmul(self._unsigned_codes, zero, self._weight_codes)

    def _scaled_range(self, divisor: np.ndarray, float_channels: np.ndarray | None) -> tuple[float, float]:
        """min and max of X/divisor over the sample, with the float-routed channels at 0, from the channel ranges."""
        low, high = self._channel_min / divisor, self._channel_max / divisor  # swapped where a divisor is negative
        low, high = np.minimum(low, high), np.maximum(low, high)
        if float_channels is not None:
            low[float_channels] = high[float_channels] = 0
        return float(low.min()), float(high.max())

    def _float_path(self, float_channels: np.ndarray) -> np.ndarray:
        """The exact float product of the routed channels (cached: candidates share one outlier set)."""
        key = np.asarray(float_channels, np.int64).tobytes()
        if key not in self._float_paths:
            self._float_paths[key] = self.rows[:, float_channels] @ self.weight[float_channels, :]
        return self._float_paths[key]


def _codes_in_place(values: np.ndarray, step: np.ndarray | float, low: float, high: float) -> np.ndarray:
    """The integer codes rint(values / step) clamped to [low, high], overwriting ``values`` (a float32 buffer of the
    caller's own); a unit step is not divided by, which leaves every value as it is."""
    if not (isinstance(step, float) and step == 1.0):
        np.divide(values, step, out=values)
    np.rint(values, out=values)
    return np.clip(values, low, high, out=values)


def _asymmetric_grid(low: float, high: float, bits: int) -> tuple[float, int]:
    """The step and zero point of the unsigned grid spanning [min(low, 0), max(high, 0)] with zero on it."""
    low, high = min(low, 0.0), max(high, 0.0)
    step = max(high - low, 1e-12) / (2**bits - 1)
    return step, int(np.rint(-low / step))


def _row_steps(scaled: np.ndarray, qmax: int) -> np.ndarray:
    """The steps that map each row's largest magnitude to qmax."""
    magnitudes = np.maximum(scaled.max(axis=1, keepdims=True), -scaled.min(axis=1, keepdims=True))
    return np.maximum(magnitudes, 1e-12) / qmax


def _column_absmax(values: np.ndarray) -> np.ndarray:
    """max |x| per column, from the column maxima and minima (no |x| temporary)."""
    return np.maximum(values.max(axis=0), -values.min(axis=0))


def block_int8_rows(rows: np.ndarray, block: int) -> np.ndarray:
    """The rows rounded to symmetric int8 per row and block of K, as MatMulNBits' int8 compute rounds its input."""
    depth = rows.shape[1]
    padded = np.zeros((rows.shape[0], -(-depth // block) * block), np.float32)
    padded[:, :depth] = rows
    blocks = padded.reshape(rows.shape[0], -1, block)
    step = np.maximum(np.abs(blocks).max(axis=2, keepdims=True), 1e-30) / 127
    return (np.clip(np.rint(blocks / step), -127, 127) * step).reshape(padded.shape)[:, :depth]


def block_int8_sqnr_db(rows: np.ndarray, weight: np.ndarray, block: int, rounded: np.ndarray | None = None) -> float:
    """Channel-averaged SQNR of rows·W with the rows rounded to symmetric int8 per row and block of K (MatMulNBits'
    int8 compute), against the float rows times the same W [K, N]; ``rounded`` is block_int8_rows(rows, block) if
    the caller has it already (layers that read one input)."""
    rounded = block_int8_rows(rows, block) if rounded is None else rounded
    reference = rows @ weight
    signal = np.maximum(np.sum(np.square(reference, dtype=np.float64), axis=0), 1e-30)
    error = np.sum(np.square(reference - rounded @ weight, dtype=np.float64), axis=0)
    mean_error = float(np.mean(error / signal))
    return math.inf if mean_error == 0 else -10.0 * math.log10(mean_error)
