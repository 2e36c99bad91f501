"""Fake-quantization of one scale group on sampled rows, to choose schemes by measured output error."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from graphquant.analysis.layers import Layer
from graphquant.rewrites import layer_bias

# group_sqnr_db handles about this many weights at a time (its float64 temporaries are a few times that).
SIMULATE_CHUNK_ELEMENTS = 1 << 20


def fake_quantize(values: np.ndarray, step: np.ndarray | float, bits: int) -> np.ndarray:
    """Symmetric round-to-nearest on a grid of the given step, clamped to the restricted signed range."""
    qmax = 2 ** (bits - 1) - 1
    return np.clip(np.rint(values / step), -qmax, qmax) * step


def weight_matrix(layer: Layer) -> np.ndarray:
    """The weight as [C_in, C_out] float64."""
    weight = layer.weight_array.astype(np.float64)
    return weight if layer.in_axis == 0 else weight.T


def group_sqnr_db(
    rows: np.ndarray,
    layers: Sequence[Layer],
    divisor: np.ndarray,
    abits: int,
    wbits: int,
    activation_step: float | None = None,
    float_channels: np.ndarray | None = None,
) -> float:
    """Channel-averaged output SQNR with X/divisor quantized (given step, else per-tensor) and W·divisor per column."""
    x = rows.astype(np.float64)
    int_path = x.copy()
    if float_channels is not None:
        int_path[:, float_channels] = 0  # those channels go through an exact float MatMul
    scaled = int_path / divisor
    qmax = 2 ** (abits - 1) - 1
    step = activation_step if activation_step is not None else max(float(np.abs(scaled).max()), 1e-12) / qmax
    x_quantized = fake_quantize(scaled, step, abits)
    # Each output channel's relative error counts equally: a few huge channels must not hide the error in the rest.
    relative_errors = []
    for layer in layers:
        weight = layer.weight_array if layer.in_axis == 0 else layer.weight_array.T
        bias = layer_bias(layer)
        # A few output columns at a time: their errors are independent, and a float64 copy of a large weight is not.
        width = max(1, SIMULATE_CHUNK_ELEMENTS // max(1, weight.shape[0]))
        for start in range(0, weight.shape[1], width):
            columns = slice(start, start + width)
            chunk = weight[:, columns].astype(np.float64)
            relative_errors.append(_column_errors(x, x_quantized, chunk, bias[columns], divisor, wbits, float_channels))
    mean_error = float(np.mean(np.concatenate(relative_errors)))
    return math.inf if mean_error == 0 else -10.0 * math.log10(mean_error)


def _column_errors(
    x: np.ndarray,
    x_quantized: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    divisor: np.ndarray,
    wbits: int,
    float_channels: np.ndarray | None,
) -> np.ndarray:
    """Each column's squared output error relative to its output energy, for [C_in, columns] float64 weights."""
    kept = weight.copy()
    if float_channels is not None:
        kept[float_channels, :] = 0
    migrated = kept * divisor[:, None]
    column_step = np.maximum(np.abs(migrated).max(axis=0), 1e-12) / (2 ** (wbits - 1) - 1)
    # The bias counts: after a shift it cancels part of X·W, and the error is relative to the sum.
    reference = x @ weight + bias
    approximate = x_quantized @ fake_quantize(migrated, column_step[None, :], wbits) + bias
    if float_channels is not None:
        approximate += x[:, float_channels] @ weight[float_channels, :]
    signal = np.maximum(np.sum(reference**2, axis=0), 1e-30)
    return np.sum((reference - approximate) ** 2, axis=0) / signal
